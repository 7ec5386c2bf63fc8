"""foldfed: synchronous cross-organization federated fine-tuning over outbound-only AMQP."""

__version__ = "0.1.0"
