package netlink

import (
	"encoding/binary"
	"fmt"
	"unsafe"
)

// Attributes (struct nlattr, struct rtattr: the same layout) are a 16-bit
// length including the 4-byte header, a 16-bit type, and the payload,
// padded to 4 bytes. The type's top bits are flags: NLA_F_NESTED (the
// payload is attributes) and NLA_F_NET_BYTEORDER.

const attrHdrLen = 4

// typeMask strips the nested and byte-order flags off an attribute's type
// (NLA_TYPE_MASK).
const typeMask = 0x3fff

// AppendAttr appends an attribute of type typ (with NLA_F_NESTED or'ed in
// for nested ones) holding data to b, padded.
func AppendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(attrHdrLen+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// AppendUint32Attr appends a u32 attribute in host byte order.
func AppendUint32Attr(b []byte, typ uint16, v uint32) []byte {
	return AppendAttr(b, typ, binary.NativeEndian.AppendUint32(nil, v))
}

// Attrs calls fn with the type (flags stripped) and payload of each
// attribute in b, in order. A length that runs past b, or is shorter than
// the header, is an error wrapping ErrMalformed; bytes after the last
// attribute that cannot hold a header are ignored, as the kernel does.
func Attrs(b []byte, fn func(typ uint16, data []byte)) error {
	for len(b) >= attrHdrLen {
		n := int(binary.NativeEndian.Uint16(b[0:]))
		typ := binary.NativeEndian.Uint16(b[2:]) & typeMask
		if n < attrHdrLen || n > len(b) {
			return fmt.Errorf("%w: attribute length %d, with %d bytes left", ErrMalformed, n, len(b))
		}
		fn(typ, b[attrHdrLen:n])
		b = b[min(Align(n), len(b)):]
	}
	return nil
}

// FindAttr returns the payload of the first attribute of type typ (flags
// ignored) in b, or nil if there is none or b is malformed before it.
func FindAttr(b []byte, typ uint16) []byte {
	var found []byte
	Attrs(b, func(t uint16, data []byte) {
		if found == nil && t == typ&typeMask {
			found = data
		}
	})
	return found
}

// StructBytes returns a copy of the bytes of a fixed-size kernel struct
// (unix.IfInfomsg, unix.IfAddrmsg, unix.RtMsg, ...), the head of a
// message body.
func StructBytes[T any](v *T) []byte {
	b := unsafe.Slice((*byte)(unsafe.Pointer(v)), unsafe.Sizeof(*v))
	return append([]byte(nil), b...)
}
