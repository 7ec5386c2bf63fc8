"""Deployment helpers: broker definitions (users and least-privilege permissions) for
compose and Kubernetes, θ_0 for a container's start, and the `foldfed health` probe."""
