"""The TCP transport: frames between ranks over authenticated TCP (and local Unix) connections.

One idea per module:

* :mod:`.transport`: :class:`TcpTransport`, the :class:`collcomm.transport.interface.Transport`
  over TCP: listeners, the links it holds, groups, closing;
* :mod:`.connections`: the listener and the connector (who connects, accepting, admission);
* :mod:`.handshake`: the token handshake on a new connection;
* :mod:`.link`: one connection's framing and its send and receive loops;
* :mod:`.reliability`: ACK/NACK, PROBE/ECHO, the retransmission timer, reconnection;
* :mod:`.detours`: sending through a relay around a link that stopped carrying data;
* :mod:`.sockets`: reading exactly, tuning, opening a socket.
"""

from collcomm.transport.tcp.connections import MAX_HANDSHAKES
from collcomm.transport.tcp.reliability import MAX_LOST_RESENDS, MAX_RETRANSMITS
from collcomm.transport.tcp.transport import TcpTransport

__all__ = ["MAX_HANDSHAKES", "MAX_LOST_RESENDS", "MAX_RETRANSMITS", "TcpTransport"]
