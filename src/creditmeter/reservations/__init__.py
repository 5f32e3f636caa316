"""``reserve()``: a hold as a context manager, released unless the block settles it."""

from creditmeter.reservations._async import AsyncReservation
from creditmeter.reservations._held import DEFAULT_TTL
from creditmeter.reservations._sync import Reservation

__all__ = ["DEFAULT_TTL", "AsyncReservation", "Reservation"]
