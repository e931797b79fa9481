"""Launching cca_jax on Cloud TPU VMs and GKE (``python -m launch.tpu --help``).

Nothing here is imported by the trainer; these are operator tools that print or run ``gcloud`` /
``kubectl`` commands. See launch/README.md.
"""
