"""Specific exceptions, each with a message that says what to do, and the worker's exit codes."""

# A worker that cannot start exits with one line and one of these (the orchestrator's
# restart policy can tell them apart).
EXIT_BAD_SETTING = 2
EXIT_DATABASE_UNAVAILABLE = 3
# Kafka cannot be reached, or a KAFKA_VALIDATE_ON_STARTUP check failed.
EXIT_KAFKA_UNAVAILABLE = 4


class HoldwallError(Exception):
    """Base of every error this service raises on purpose."""


class SettingsError(HoldwallError):
    """A setting has a bad value; the message is one line naming the variable."""


class EventValidationError(HoldwallError):
    """An event submitted for storage is malformed; the message says which field."""


class TopicMismatchError(HoldwallError):
    """A topic exists with a partition count other than KAFKA_PARTITIONS."""


class KafkaDisabledError(HoldwallError):
    """A Kafka operation was asked for while KAFKA_ENABLED=false."""


class CircuitOpenError(HoldwallError):
    """The Kafka circuit breaker is open; calls are refused until it half-opens."""


class HandlerConfigError(HoldwallError):
    """A pipeline handler cannot be registered (PIPELINE_HANDLERS entry or duplicate type)."""


class DatabaseUnavailableError(HoldwallError):
    """The database cannot be reached; the message names DATABASE_URL (password hidden)."""


class DatabaseStalledError(HoldwallError):
    """A unit of database work outlived its deadline: the server stopped answering without
    closing the connection. The work was given up and the pool's connections dropped."""


class SchemaMissingError(HoldwallError):
    """The database has no holdwall-stream tables: another database, or not initialised."""


class RequeueRefusedError(HoldwallError):
    """A parked outbox row cannot go back to the relay; the message says why and what to do."""
