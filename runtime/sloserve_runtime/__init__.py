"""sloserve runtime: the SLO-aware engine, its server, the CLI and the measuring tools."""
