"""The Hub webhook bot: ``loraship serve``. A new tag (or a watched branch moving) on an adapter repo
triggers merge + verify + publish, run durably (SQLite queue) by an executor, reported on the Hub."""
