"""Volume backups: snapshots of a volume's tree into the content-addressed store."""
