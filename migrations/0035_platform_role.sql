-- Staff of the city platform (role 'platform'): they decide plate ownership claims, which are
-- the city's and no car park company's. A platform user belongs to the platform's own company
-- (created with `parking admin company create`), which runs no car parks; the role passes no
-- company route (OperatorDep is 'admin' and 'attendant' only).
ALTER TABLE operator_users DROP CONSTRAINT operator_users_role_check;
ALTER TABLE operator_users ADD CONSTRAINT operator_users_role_check
    CHECK (role IN ('admin', 'attendant', 'merchant', 'platform'));
