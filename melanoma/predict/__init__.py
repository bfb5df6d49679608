"""Running a checkpoint on images: the Predictor (preprocessing, calibration, the one decision
rule), test-time augmentation and ONNX export. Evaluation uses this room; it never uses
evaluation."""

from melanoma.predict.predictor import (MELANOMA_DECISION, NOT_MELANOMA_DECISION, NonFiniteOutputError, Predictor,
                                        decide)

__all__ = ["MELANOMA_DECISION", "NOT_MELANOMA_DECISION", "NonFiniteOutputError", "Predictor", "decide"]
