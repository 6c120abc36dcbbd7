"""Orders: placement with its order.created in one transaction; status follows the saga."""

from consumers.orders.handlers import (
    HANDLERS,
    handle_order_cancelled,
    handle_order_completed,
    handle_order_rejected,
    place_order,
)
from consumers.orders.rules import Order, OrderStatus
from consumers.orders.store import get_order, order_statuses
from consumers.orders.tables import SERVICE, orders_orders

__all__ = [
    "HANDLERS",
    "SERVICE",
    "Order",
    "OrderStatus",
    "get_order",
    "handle_order_cancelled",
    "handle_order_completed",
    "handle_order_rejected",
    "order_statuses",
    "orders_orders",
    "place_order",
]
