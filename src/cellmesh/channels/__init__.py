"""Channels: subscribe/publish over sessions, with access decided once and checked per packet."""
