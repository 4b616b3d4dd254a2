# Sourced by the run_gpu_*.sh scripts: the lent machines' NCCL rules (NVLink multicast
# off, in every process the engine spawns too) and unbuffered logs.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 FASTVIDEO_CACHE_DIR=/tmp/fastvideo-cache
nvidia-smi --query-gpu=index,name,memory.total --format=csv
