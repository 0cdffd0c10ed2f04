"""Verifiable rewards: math answers checked by equivalence, programs run against tests in a sandbox."""

from .math_reward import MathAccuracyReward, MathGrade, MathVerifier, Outcome, extract_answer


__all__ = ["MathAccuracyReward", "MathGrade", "MathVerifier", "Outcome", "extract_answer"]
