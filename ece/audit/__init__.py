"""The edit ledger, checkpoints, and the audit/diff/rollback queries."""
