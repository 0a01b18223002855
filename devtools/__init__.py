"""Local and development tooling: the Maven-jar Kafka broker, the demo, component processes."""
