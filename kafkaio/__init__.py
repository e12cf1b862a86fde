"""The Kafka layer the stream processor and the workers share: acknowledged producing, the
consume-error policy, dead letters, consumer lag, and committing only acknowledged offsets.

Imports only `schemas/`, confluent-kafka, prometheus_client and the standard library.
"""
