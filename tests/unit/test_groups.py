from pipeline.groups import DEFAULT_GROUP, device_grouper


def test_named_group_first_group_whole_match_and_default():
    assert device_grouper(r"^(?P<group>[a-z]+)-")("pump-17") == "pump"
    assert device_grouper(r"^site(\d+)/")("site12/pump-3") == "12"
    assert device_grouper(r"north|south")("dev-south-4") == "south"
    assert device_grouper(r"^x-")("pump-1") == DEFAULT_GROUP
    assert device_grouper("")("anything") == DEFAULT_GROUP
