-- Runs once, when the compose Postgres volume is created: a demo table under capture.
CREATE EXTENSION pgpipe;
CREATE TABLE orders (id serial PRIMARY KEY, status text NOT NULL, total numeric(10, 2));
SELECT pgpipe.subscribe('orders');
