-- Generated from holdwall_stream/db/models.py by `make ddl`; do not edit.

CREATE TABLE dead_letters (
	id INTEGER NOT NULL, 
	event_id CHAR(32), 
	"key" BLOB, 
	raw BLOB, 
	reason VARCHAR(100) NOT NULL, 
	error TEXT NOT NULL, 
	headers JSON NOT NULL, 
	original_topic VARCHAR(249), 
	original_partition INTEGER, 
	original_offset BIGINT, 
	attempts INTEGER NOT NULL, 
	dlq_partition INTEGER NOT NULL, 
	dlq_offset BIGINT NOT NULL, 
	created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
	replayed_at DATETIME, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_dead_letters_event_id ON dead_letters (event_id);

CREATE UNIQUE INDEX ux_dead_letters_dlq_position ON dead_letters (dlq_partition, dlq_offset);

CREATE TABLE events (
	id CHAR(32) NOT NULL, 
	type VARCHAR(200) NOT NULL, 
	aggregate_id VARCHAR(500) NOT NULL, 
	occurred_at DATETIME NOT NULL, 
	schema_version INTEGER NOT NULL, 
	data JSON NOT NULL, 
	created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE outbox (
	id INTEGER NOT NULL, 
	event_id CHAR(32) NOT NULL, 
	topic VARCHAR(249) NOT NULL, 
	partition INTEGER NOT NULL, 
	"key" BLOB NOT NULL, 
	payload BLOB NOT NULL, 
	headers JSON NOT NULL, 
	created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
	published BOOLEAN DEFAULT 0 NOT NULL, 
	published_at DATETIME, 
	attempts INTEGER DEFAULT 0 NOT NULL, 
	last_error TEXT, 
	dead_lettered_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (event_id)
);

CREATE INDEX ix_outbox_dead_lettered ON outbox (id) WHERE dead_lettered_at IS NOT NULL;

CREATE INDEX ix_outbox_published_at ON outbox (published_at) WHERE published = 1;

CREATE INDEX ix_outbox_unpublished ON outbox (partition, id) WHERE published = false AND dead_lettered_at IS NULL;

CREATE TABLE processed_events (
	event_id CHAR(32) NOT NULL, 
	type VARCHAR(200) NOT NULL, 
	processed_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f', 'now')) NOT NULL, 
	PRIMARY KEY (event_id)
);

CREATE TABLE relay_locks (
	partition INTEGER NOT NULL, 
	PRIMARY KEY (partition)
);
