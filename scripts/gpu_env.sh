# Sourced by the GPU scripts on the lent machine: NVLink multicast off (it can take the host's
# shared GPUs out of service), unbuffered Python, $OUT, and the carried wheels (PyAV, yunchang,
# diffusers; see docs/TESTING.md) installed into /tmp/site when .whl/ holds any.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-outputs/${GPU_SCRIPT:-gpu}}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
