"""Shared building blocks of the distillation scripts: data, chat masking, models, losses, the loop.

Modules depend downward only: train -> checkpoint; losses depend on nothing. No module here knows
which distillation method is running; the scripts pass their step functions in.
"""
