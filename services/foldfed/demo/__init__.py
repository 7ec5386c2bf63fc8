"""`foldfed demo`: a whole federated run on one machine, on a private local broker."""
