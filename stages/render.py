"""render: gold images for every markup item, or a reject with its reason -> data/rendered/<domain>/."""

from markup2image.data.render import main

if __name__ == "__main__":
    main()
