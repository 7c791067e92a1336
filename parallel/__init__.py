"""Everything distributed: process groups and the device mesh (``mesh``), topology tables
(``topology``), token shards (``sequence``), and the hybrid Ulysses x Ring joint attention
(``attention``; local kernels in ``kernels``, ``local``, ``ring``, collectives in ``comm``;
reference backends in ``baselines``). ``models/`` never imports ``torch.distributed``; it is
handed an attention callable from here."""
