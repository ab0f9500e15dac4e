// Package layers holds no code: its test checks that gonetns's packages
// import only packages of lower layers (the table in layers_test.go), so
// that the dependency arrows all run one way and a package never reaches
// up to one built on it.
package layers
