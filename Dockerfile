# fastinst in an NGC PyTorch container (CUDA 13, PyTorch, apex where NVIDIA ships it).
#   docker build -t fastinst .
#   docker run --gpus all --ipc=host --shm-size=64g -v /data:/data fastinst \
#       torchrun --nproc_per_node=8 launch.py profile --config configs/profile_simclr.yaml --out /data/runs/profile data.path=/data/imagenet-zip
# --shm-size matters: data.cache=full|part keeps the encoded images in /dev/shm.
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/fastinst
COPY requirements.txt .
# The container's own torch/torchvision are kept (the code needs nothing newer than torch 2.4);
# only DALI, the small pure-Python dependencies and scikit-learn (launch.py svm) are added.
RUN pip install --no-cache-dir nvidia-dali-cuda130==2.4.0 "pyyaml>=6.0" "numpy>=1.24" "pillow>=10.0" "scikit-learn>=1.3"
COPY . .
ENV PYTHONUNBUFFERED=1
CMD ["python", "launch.py", "--help"]
