"""What happens on a GPU host: jobs, launch and watch, prewarm, placement and allocation, host
checks, the container template, diagnosis, reconcile and garbage collection."""
