-- The operator's audit log (GET /api/v1/operator/audit-log) reads what the company's staff
-- did, newest first, a page at a time: by actor, then id.
CREATE INDEX audit_log_actor ON audit_log (actor, id DESC);
