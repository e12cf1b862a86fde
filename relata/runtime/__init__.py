"""The local runtime: embedded Kafka, topic admin, data producers, process supervision, the
whole pipeline on one machine and the demo."""
