"""What a `generate` job writes: each prompt's video (mp4, grid, latents) and its JSON record,
on the first rank of the replica that made it (``VideoWriter``), and the record's contents."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from parallel.backends import AttentionChoice
from parallel.mesh import REPLICA_AXES, MeshAxis, ParallelMesh
from parallel.vae_decode import run_tiled

from . import pipeline as ph
from .memory_plan import MemoryPlan
from .record import PhaseTimer, command_line, hostname, now_iso, peak_memory, run_context, versions

if TYPE_CHECKING:
    from .job import Job

log = logging.getLogger("launcher")
# The record's `vae_decode.path`: tiles over every rank of the replica, or the first rank alone.
SHARED, FIRST_RANK = "shared-tiles", "first-rank"
# The two names torch reads its allocator settings from.
ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def is_writer(mesh: ParallelMesh | None) -> bool:
    """The first rank of each dp replica decodes and writes that replica's videos."""
    return mesh is None or (mesh.sp_rank == 0 and mesh.local_rank(MeshAxis.CFG) == 0)


class VideoWriter:
    """Decodes and writes each prompt's video on the first rank of its replica. When the VAE
    fits beside the placed DiT (``MemoryPlan.decodes_beside_dit``) a video is written as soon as
    its prompt is done, so a stopped batch keeps what it finished; otherwise the latents wait
    (on the host) until the DiT is freed, on every rank. A tiled decode is shared: every rank of
    the replica decodes a run of the tiles (``parallel.vae_decode``) and the first one stitches
    and writes. ``done`` holds the prompts finished, which an OOM fallback does not run again."""

    def __init__(self, job: Job, mesh: ParallelMesh | None, timer: PhaseTimer):
        self.job, self.mesh, self.timer = job, mesh, timer
        self.is_writer = is_writer(mesh)
        self.done: set[int] = set()
        self.held: list[tuple] = []
        self.written: list[Path] = []
        self.vae = None

    def on_prompt(self, plan: MemoryPlan, oom: str | None):
        """The callback ``_denoise_all`` calls after each prompt, on every rank of the replica."""
        inline = plan.decodes_beside_dit(self.job.memory.limit)

        def finished(i: int, latents: torch.Tensor, step_s: list[float], host: str | None, attention,
                     cache: dict | None = None, compiled: dict | None = None) -> None:
            self.done.add(i)
            # Every rank of the replica ran this prompt: gather its ranks' peaks, in step.
            mine = {"host": hostname(), **peak_memory(self.job.device)}
            peaks = self.mesh.gather_objects(mine, REPLICA_AXES) if self.mesh is not None else [mine]
            shares = not self.job.cfg.no_video and self._decode_path(plan)[0] == SHARED
            if not (self.is_writer or shares):
                return
            item = (i, latents, step_s, peaks, plan, memory_record(self.job, plan, oom, host), attention, cache,
                    compiled)
            if inline:
                self._write(*item)
            else:
                self.held.append(item)

        return finished

    def _decode_path(self, plan: MemoryPlan) -> tuple[str, str]:
        """(path, why): ``SHARED`` (every rank of the replica decodes tiles) or ``FIRST_RANK``."""
        family, tiling = self.job.family, plan.placement.vae_tiling
        replica = 1 if self.mesh is None else self.mesh.size(MeshAxis.CFG) * self.mesh.sp_size
        if replica == 1:
            return FIRST_RANK, "a replica of one rank"
        if tiling == "off":
            return FIRST_RANK, "untiled (--vae-tiling off): one pass cannot be split by tiles"
        if family.vae.split_decode is None:
            return FIRST_RANK, f"the {family.name} VAE has no tiles to split"
        return SHARED, f"{ph.decode_tiling(family, tiling)} tiles over the {replica} ranks of the replica"

    def _decode(self, latents: torch.Tensor, plan: MemoryPlan) -> tuple[torch.Tensor | None, dict]:
        """The video (on the first rank; None on the others) and the record's ``vae_decode``."""
        job, timer = self.job, self.timer
        if self.vae is None:
            with timer.phase("load_vae"):
                self.vae = ph.load_vae(job.family, job.dit, job.cfg.model_dir, job.device)
        path, why = self._decode_path(plan)
        tiling = ph.decode_tiling(job.family, plan.placement.vae_tiling)
        start = time.perf_counter()
        with timer.phase("vae_decode"):
            if path == SHARED:
                run = run_tiled(job.family.vae.split_decode(self.vae, latents, tiling), self.mesh)
                video, tiles, seconds = run.result, run.tiles_per_rank, run.seconds_per_rank
            else:
                video = ph.decode(job.family, self.vae, latents, tiling)
                tiles, seconds = None, None
        info = {"path": path, "why": why, "tiling": tiling, "seconds": time.perf_counter() - start,
                "tiles_per_rank": tiles, "seconds_per_rank": seconds}
        return video, info

    def _write(self, i, latents, step_s, peaks, plan, memory, attention, cache, compiled) -> None:
        from .video import whole_or_none, write_json_atomic

        job, cfg, timer = self.job, self.job.cfg, self.timer
        video, decode = None, None
        if not cfg.no_video:
            video, decode = self._decode(latents, plan)
        if not self.is_writer:
            return
        replace = cfg.overwrite or cfg.skip_existing
        try:
            with whole_or_none(job.paths[i].values()):
                with timer.phase("write"):
                    ph.write_outputs(job.paths[i], video, latents, fps=cfg.fps, overwrite=replace)
                rec = record(job, i, timer, step_s, peaks, attention) | {"memory": memory, "vae_decode": decode,
                                                                          "step_cache": cache, "compile": compiled}
                write_json_atomic(rec, job.paths[i]["record"], overwrite=replace)
        except OSError as err:  # a full disk or a folder gone read-only: one line, nothing partial kept
            raise ph.RankFailure(f"writing prompt {i + 1}'s outputs to {cfg.output_dir} failed "
                                 f"({err.strerror or err}); none of its files were kept") from err
        main = job.paths[i]["latents" if cfg.no_video else "video"]
        log.info("wrote %s: %d steps in %.1f s, %.1f s since the text encoding began, peak %s", main, len(step_s),
                 sum(step_s), timer.elapsed(), _peak_text(peaks))
        self.written.append(main)

    def release(self) -> None:
        """Free the VAE (before an OOM fallback rebuilds the DiT, and at the end)."""
        self.vae = None
        if self.job.device.type == "cuda":
            torch.cuda.empty_cache()

    def finish(self) -> list[Path]:
        for item in self.held:  # the DiT is freed by now
            self._write(*item)
        self.held = []
        self.release()
        return self.written


def memory_record(job: Job, plan: MemoryPlan, oom: str | None, host: str | None) -> dict:
    """The record's `memory`: the plan, the one that ran, the fallback's cause, the host store."""
    return {**job.memory.plan.to_dict(), "reason": job.memory.reason, "used": plan.to_dict(),
            "fallback_after_oom": oom, "host_store": host,
            "budget_gib": None if job.memory.budget is None else job.memory.budget / 2**30,
            "allocator_conf": next((os.environ[v] for v in ALLOC_CONF_VARS if v in os.environ), None)}


def _peak_text(peaks: list[dict]) -> str:
    """The largest rank's peak: GPU memory on CUDA, host memory on the CPU."""
    key, where = ("gpu_device_peak_gib", "GPU") if "gpu_device_peak_gib" in peaks[0] else ("host_rss_gib", "host")
    return f"{max(p[key] for p in peaks):.2f} GiB {where} memory per rank"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def conventions(job: Job) -> dict:
    """The numeric conventions that decide the output, as this run applied them (the release's
    unless a flag chose otherwise)."""
    from models.sampling import embedded_guidance_tensor

    guidance = None
    if job.guidance is not None:
        guidance = float(embedded_guidance_tensor(job.guidance, 1, job.dtype)[0])
    noise = ({"source": "release", "generator": job.device.type, "dtype": _dtype_name(job.text_dtype)}
             if job.cfg.noise == "release" else {"source": "cpu", "generator": "cpu", "dtype": "float32"})
    return {
        "embedded_guidance_value": guidance,  # scale x 1000 as rounded in the DiT's dtype
        "prompt": "stripped of surrounding whitespace",
        "noise": noise,
        "text_encoder_dtype": _dtype_name(job.text_dtype),
        "vae_dtype": _dtype_name(ph.vae_dtype_for(job.family, job.device)),
        "frames_to_uint8": "clamp to [0, 1] in the VAE's dtype, x 255 in fp32, truncate",
    }


def record(job: Job, i: int, timer: PhaseTimer, step_s: list[float], peaks: list[dict],
           attention: AttentionChoice | None) -> dict:
    """The JSON record beside video `i`."""
    cfg, topo, paths = job.cfg, job.topology.topology, job.paths[i]
    return {
        "prompt": cfg.prompts[i],
        "negative_prompt": cfg.negative_prompt if cfg.uses_cfg else None,
        "seed": cfg.seed + i,
        "model": {"family": job.family.name, "preset": cfg.preset,
                  "model_dir": None if cfg.model_dir is None else str(cfg.model_dir),
                  "random_weights": cfg.model_dir is None, "files": job.weight_files},
        "size": [cfg.height, cfg.width],
        "frames": cfg.frames,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "cfg_scale": cfg.cfg_scale,
        "flow_shift": cfg.flow_shift,
        "fps": cfg.fps,
        "dtype": _dtype_name(job.dtype),
        "device": str(job.device),
        "conventions": conventions(job),
        "topology": {"world_size": job.world, "dp": topo.dp, "cfg": topo.cfg, "ring": topo.ring,
                     "ulysses": topo.ulysses, "source": job.topology.source},
        "topology_table": job.table_path,
        "attention": attention.as_dict() if attention is not None else None,
        "timings_s": {**timer.seconds, "denoise_this_video": sum(step_s)},
        "step_s": step_s,
        "peak_memory": peak_memory(job.device),
        "peak_memory_per_rank": peaks,  # the ranks of the replica that made this video
        "versions": versions(),
        "run": run_context([p["host"] for p in peaks]),
        "outputs": {"video": None, **{k: str(v) for k, v in paths.items()}},  # video None: --no-video
        "command": command_line(),
        "started": timer.started,
        "wall_s": timer.elapsed(),
        "finished": now_iso(),
    }
