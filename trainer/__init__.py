"""The student side of SAGE-OPD: rollouts, losses, training, evaluation and the CLI.

Submodules import torch only where they train or generate, so the CLI stays quick.
"""
