-- Roles and database of the parking cluster, run once by an administrator on the primary
-- (docs/deployment.md, "Startup order"):
--   psql -v owner_password=... -v svc_password=... -v replicator_password=... -f roles.sql

-- The owner runs the migrations (the migrate Job): all DDL. CREATEROLE because migration 0005
-- creates the parking_app group role (and PostgreSQL checks that right even when the role
-- already exists).
CREATE ROLE parking_owner LOGIN CREATEROLE PASSWORD :'owner_password';
CREATE DATABASE parking OWNER parking_owner;

-- The services' login: a member of parking_app, which the migrations grant reading and writing
-- the tables and only appending to the ledger. It cannot run DDL: a service that finds a
-- migration missing stops at start instead of migrating as itself. Created here, before the
-- migrations, so that the Secret can be filled at once; migration 0005 leaves it as it is.
CREATE ROLE parking_app NOLOGIN;
CREATE ROLE parking_svc LOGIN PASSWORD :'svc_password' IN ROLE parking_app;

-- Streaming replication (pg_basebackup, the standbys' primary_conninfo).
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replicator_password';
