"""Stock: on-hand and reserved counters per SKU, one reservation per order, with expiry."""

from consumers.stock.handlers import (
    HANDLERS,
    expire_reservations,
    handle_commit_stock,
    handle_release_stock,
    handle_reserve_stock,
    lock_batch,
    make_handlers,
)
from consumers.stock.rules import RESERVATION_TTL
from consumers.stock.store import committed_stock, reservation_statuses, seed_stock, stock_levels
from consumers.stock.tables import SERVICE, stock_items, stock_reservations

__all__ = [
    "HANDLERS",
    "RESERVATION_TTL",
    "SERVICE",
    "committed_stock",
    "expire_reservations",
    "handle_commit_stock",
    "handle_release_stock",
    "handle_reserve_stock",
    "lock_batch",
    "make_handlers",
    "reservation_statuses",
    "seed_stock",
    "stock_items",
    "stock_levels",
    "stock_reservations",
]
