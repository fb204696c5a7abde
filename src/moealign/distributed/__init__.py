"""Scale-out on torch.distributed (DESIGN.md §9): the rank context, DDP, FSDP2 and expert
parallelism."""
