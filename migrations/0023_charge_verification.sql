-- A charge on an uncalibrated reader's word waits for a second reader (issue #15).
--
-- "Certain" means a calibrated score (DESIGN.md, "The exit decision" 5). Server OCR's scores
-- are calibrated (plate_recognition/calibration.json), an operator's read is certain, and a
-- camera model's only where an installer measured it (PARKING_CAMERA_CERTAIN_SCORES). A plate
-- that fools a camera the same way at entry and exit does it with a confident score both
-- times, so a charge whose reads are not both *proven* is recorded 'awaiting_verification'
-- (no ledger line, nothing sent) with a 'verify_charge' job: the worker reads the entry's and
-- the exit's frames with the server's reader, and the charge goes on ('pending', accrued and
-- queued, once) when they agree, or waits for an operator ('awaiting_confirmation') when they
-- do not (lanes.rules.verify_charge). The gate's decision is not slowed: the car has left.

-- Whether the stay's entry read was certain by a calibrated score (rules.is_proven). Stays open
-- now count as proven when their entry was a certain read of the server's reader or an
-- operator's; a camera's certain read is not (no camera model was calibrated before this).
ALTER TABLE sessions ADD COLUMN entry_proven boolean NOT NULL DEFAULT false;
UPDATE sessions s SET entry_proven = true
    FROM capture_keys k
    JOIN captures c ON c.capture_id = k.capture_id AND c.captured_at = k.captured_at
    WHERE s.status = 'open' AND k.capture_id = s.entry_capture_id
      AND c.read_certain AND c.plate_source IN ('ocr', 'operator');

-- The same for any capture's read. NULL for captures decided before this.
ALTER TABLE captures ADD COLUMN read_proven boolean;

-- The capture's further frames after the first (`images` of the capture message): the
-- verification reads them all. Erased with the first after PARKING_IMAGE_RETENTION_DAYS.
ALTER TABLE capture_frames ADD COLUMN more_images bytea[];

ALTER TABLE charges DROP CONSTRAINT charges_status_check;
ALTER TABLE charges ADD CONSTRAINT charges_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'awaiting_confirmation', 'cancelled',
                      'awaiting_verification'));
-- What the server's reader found ({"verdict", "entry", "exit"}: each end's frame reads).
ALTER TABLE charges ADD COLUMN verification jsonb;

ALTER TABLE outbox DROP CONSTRAINT outbox_kind_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_kind_check
    CHECK (kind IN ('charge', 'notification', 'refund', 'gate_command', 'verify_charge'));
