"""cfiw inside other trainers: `trl` (TRL's GRPOTrainer with CFIW per-token advantages)."""
