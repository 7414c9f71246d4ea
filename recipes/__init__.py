"""Shipped recipes (YAML data), installed as package data so `condkit train NAME` finds them."""
