-- A server read is certain, and so proven, of a vehicle only with a colour its frames showed
-- surely (issue #15, `lanes.rules.is_certain`): its score calibrates the characters, and a
-- blue and a yellow 浙A12345 are two vehicles. Stays still open that were opened on a server
-- read before (its colour maybe the frames' guess or the doubtful camera's) are proven no
-- more: their charges wait for the server's reader to see the colour in the frames. A green
-- plate's eight characters settle its colour.
UPDATE sessions s SET entry_proven = false
FROM captures c
WHERE s.status = 'open' AND s.entry_proven
  AND c.capture_id = s.entry_capture_id AND c.plate_source = 'ocr'
  AND char_length(s.plate) <> 8;
