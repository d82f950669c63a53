"""Training beyond one machine's processes: volunteers on their own machines joined by torchft (swarm.py: DiLoCo,
lighthouse.py: its coordinator). torchrun's DDP and FSDP live in train/parallel.py."""
