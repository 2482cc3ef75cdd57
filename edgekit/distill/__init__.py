"""Knowledge distillation: recover a pruned student's quality from the original model (the teacher).

    from edgekit.distill import DistillConfig, distill
    distill(teacher_dir, student_dir, out_dir, DistillConfig(tokens=200_000))

Only torch-free modules are imported here; the loop imports torch when it runs.
"""

from edgekit.distill.config import DataConfig, DistillConfig, LossConfig, OptimConfig


def distill(*args, **kwargs) -> dict:
    from edgekit.distill.train import distill as _distill

    return _distill(*args, **kwargs)


__all__ = ["DataConfig", "DistillConfig", "LossConfig", "OptimConfig", "distill"]
