# fastinst in an NGC PyTorch container (CUDA 13, PyTorch, DALI and apex as NVIDIA ships them).
#   docker build -t fastinst .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data fastinst \
#       train --config configs/npid_imagenet_r50.yaml --out /data/runs/npid_r50 data.path=/data/imagenet-zip
# --ipc=host (or a large --shm-size): data.cache=full|part and DALI's / DataLoader's workers use
# /dev/shm; the two --ulimit flags are NVIDIA's recommendation for its PyTorch containers.
# The entry point (scripts/entrypoint.sh) runs launch.py under torchrun, one process per GPU;
# NNODES, RDZV_ENDPOINT, NPROC_PER_NODE and MAX_RESTARTS configure several nodes (README "Multi-node").
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/fastinst
COPY requirements.txt .
# The container's own torch, torchvision and DALI are kept (NGC pins them in
# /etc/pip/constraint.txt; the code needs nothing newer than torch 2.4): DALI is installed only
# where the image has none, and the small pure-Python dependencies under NGC's constraints.
RUN python -c "import nvidia.dali" 2>/dev/null || pip install --no-cache-dir nvidia-dali-cuda130==2.4.0; \
    c=""; [ -f /etc/pip/constraint.txt ] && c="-c /etc/pip/constraint.txt"; \
    pip install --no-cache-dir $c "pyyaml>=6.0" "numpy>=1.24" "pillow>=10.0" "scikit-learn>=1.3"
COPY . .
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["bash", "scripts/entrypoint.sh"]
