"""Charges awaiting an operator's confirmation: exits whose pay-later charge could not rest on
two certain reads (DESIGN.md, "The exit decision" 5) under the car park's 'open_confirm'
policy. The operator compares the entry and exit frames, then confirms (the charge is queued,
once) or rejects (no charge; the exit goes to the exception queue for the right plate)."""
