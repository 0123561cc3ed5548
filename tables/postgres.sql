-- Generated from holdwall_stream/db/models.py by `make ddl`; do not edit.

CREATE TABLE dead_letters (
	id BIGSERIAL NOT NULL, 
	event_id UUID, 
	key BYTEA, 
	raw BYTEA, 
	reason VARCHAR(100) NOT NULL, 
	error TEXT NOT NULL, 
	headers JSON NOT NULL, 
	original_topic VARCHAR(249), 
	original_partition INTEGER, 
	original_offset BIGINT, 
	attempts INTEGER NOT NULL, 
	dlq_partition INTEGER NOT NULL, 
	dlq_offset BIGINT NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	replayed_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_dead_letters_event_id ON dead_letters (event_id);

CREATE UNIQUE INDEX ux_dead_letters_dlq_position ON dead_letters (dlq_partition, dlq_offset);

CREATE TABLE events (
	id UUID NOT NULL, 
	type VARCHAR(200) NOT NULL, 
	aggregate_id VARCHAR(500) NOT NULL, 
	occurred_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	schema_version INTEGER NOT NULL, 
	data JSON NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE outbox (
	id BIGSERIAL NOT NULL, 
	event_id UUID NOT NULL, 
	topic VARCHAR(249) NOT NULL, 
	partition INTEGER NOT NULL, 
	key BYTEA NOT NULL, 
	payload BYTEA NOT NULL, 
	headers JSON NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	published BOOLEAN DEFAULT false NOT NULL, 
	published_at TIMESTAMP WITH TIME ZONE, 
	attempts INTEGER DEFAULT 0 NOT NULL, 
	last_error TEXT, 
	dead_lettered_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	UNIQUE (event_id)
)
 WITH (fillfactor = 50);

CREATE INDEX ix_outbox_dead_lettered ON outbox (id) WHERE dead_lettered_at IS NOT NULL;

CREATE INDEX ix_outbox_published_at ON outbox (published_at) WHERE published = true;

CREATE INDEX ix_outbox_unpublished ON outbox (partition, id) WHERE published = false AND dead_lettered_at IS NULL;

CREATE TABLE processed_events (
	event_id UUID NOT NULL, 
	type VARCHAR(200) NOT NULL, 
	processed_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL, 
	PRIMARY KEY (event_id)
);

CREATE TABLE relay_locks (
	partition INTEGER NOT NULL, 
	PRIMARY KEY (partition)
);
