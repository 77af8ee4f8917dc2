-- An operator's refunds list reads its own car parks' refunds of a period; without this it
-- read every company's refunds of the period and dropped the others (1.9 s with 300k foreign
-- rows, issue #17).
CREATE INDEX refunds_car_park_created ON refunds (car_park_id, created_at);
