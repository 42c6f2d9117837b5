"""The Kafka half: records in, replies out (clients, fetch loop, offsets and commits, delivery, topics, brokers)."""
