-- A consumption line recorded by mistake can be voided within the bar's grace period (policy.void_grace_s),
-- with a reason and who did it; the line stays, marked, and no longer counts in the session's total.
ALTER TABLE consumption ADD COLUMN voided_at INTEGER;
ALTER TABLE consumption ADD COLUMN void_reason TEXT;
ALTER TABLE consumption ADD COLUMN voided_by TEXT;
