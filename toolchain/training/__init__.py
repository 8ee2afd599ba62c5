"""Training: losses, the teacher's top-k cache, batches, the step, the online teacher, master weights, on-policy
rollouts, the trainer's phases, and how several training processes are started."""
