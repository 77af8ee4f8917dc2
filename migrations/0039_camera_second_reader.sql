-- The camera's own read of a capture the server's reader decided (issue #15).
--
-- When the camera is doubtful the lane decides on the server's read of the frames
-- (plate_source 'ocr'), and the captures row keeps that decided read. A charge on such an end
-- used to wait for an operator: the server reading its own frames again is no second reader.
-- The camera is one: the verification counts the end as corroborated when the camera's own
-- text is the stay's plate (its colour agreeing when it gave one) and the server's frames
-- agree (lanes.rules.frames_to_verify). NULL: the camera decided the read itself, or sent none.
ALTER TABLE captures
    ADD COLUMN camera_plate text,
    ADD COLUMN camera_color text,
    ADD COLUMN camera_confidence real,
    ADD COLUMN camera_model text;
