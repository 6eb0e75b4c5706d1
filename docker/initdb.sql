-- Runs once, when the compose Postgres volume is created: a demo table under capture,
-- and the forwarder's login role with only what a forwarder needs (pgpipe_consumer and
-- SELECT on the captured table; see README, "Who may do what").
CREATE EXTENSION pgpipe;
CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL, total numeric(10, 2));
SELECT pgpipe.subscribe('orders');
CREATE ROLE pgpipe_forwarder LOGIN PASSWORD 'pgpipe' IN ROLE pgpipe_consumer;
GRANT SELECT ON orders TO pgpipe_forwarder;
