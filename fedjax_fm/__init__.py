"""fedjax_fm: federated fine-tuning of foundation models in JAX/Flax.

Clients are an array axis, not a Python loop: all local updates of a round run as one jitted
program (vmap over clients, lax.scan over local steps, the client axis sharded over a mesh).
"""

__version__ = "0.1.0"
