"""Routing analysis: capture what the MoE experts do (`capture`), store it (`routes`), draw it (`plot`)."""
