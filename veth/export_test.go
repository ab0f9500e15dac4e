package veth

// SetRcvbufRequest makes Open ask for n bytes of receive buffer per
// receiving socket, and returns what it asked before.
func SetRcvbufRequest(n int) int {
	old := rcvbufRequest
	rcvbufRequest = n
	return old
}
