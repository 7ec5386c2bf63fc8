"""The model families the trainer can run (trainer/backend.py lists them): one module each,
imported only when its family is used."""
